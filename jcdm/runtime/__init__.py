"""System code, free of the method's math: process start-up and the peer watchdog, the device
mesh and partition rules, checkpoints, preemption, and metrics/W&B reporting.
"""
