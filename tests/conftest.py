import torch

# Tiny tensors dominate the suite: one thread avoids oversubscribing CI's 2 cores.
torch.set_num_threads(1)
