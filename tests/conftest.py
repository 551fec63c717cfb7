"Shared test setup: few threads (2-core CI), quiet warnings from third-party deprecations."
import os
import warnings

import pytest
import torch

torch.set_num_threads(2)
os.environ.setdefault("MPLBACKEND", "Agg")
warnings.filterwarnings("ignore", category=FutureWarning)
warnings.filterwarnings("ignore", category=DeprecationWarning)
warnings.filterwarnings("ignore", category=UserWarning, module="torchvision")
