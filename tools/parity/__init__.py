"""The parts of tools/reference_parity.py, the parity check against boingkiri/joint_training."""
