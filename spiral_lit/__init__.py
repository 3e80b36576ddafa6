"""spiral_lit: SPIRAL (Sequential-Parallel-Aggregative RL) on PyTorch Lightning."""

from spiral_lit.data import ProblemDataModule
from spiral_lit.module import SpiralModule
from spiral_lit.sft import WarmStartModule

__all__ = ["ProblemDataModule", "SpiralModule", "WarmStartModule"]
__version__ = "0.1.0"
