"""reflow_exp: Reflow (2-rectified flow) distillation of LeRobot's SmolVLA.

Time convention everywhere (SmolVLA's): t=1 is pure noise, t=0 is the action; Euler steps use
dt = -1/steps.
"""
