"""Shared test settings.

One intra-op thread: the tiny models of the parity tests run as fast on one thread, and the suite does not
oversubscribe a small (2-core) machine when other work is running on it.
"""

import torch

torch.set_num_threads(1)
