"""Reinforcement learning with knowledge flow (paper §4.1): A2C and A3C agents on MinAtar, Atari and classic control.

Needs the ``rl`` extra (gymnasium, ale-py) and, for MinAtar, the ``minatar`` extra (GPL-3.0).
"""

from graftnet.rl.trainer import train_rl

__all__ = ["train_rl"]
