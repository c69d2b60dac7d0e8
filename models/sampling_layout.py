"""The ``params`` tensor of the device sampler (``tir_kernels/sampling.py``, ``sample`` in
``models/llama.py``), shared by the kernel and the runtime (``tsedge/device_sampling.py``).

params[PARAMS] float32, one entry per name below, in this order:
temperature (0: greedy), top_p (1: off), top_k (0: off; an integer value), repetition_penalty
(1: off), presence_penalty, frequency_penalty, the uniform number in [0, 1) of the step's draw,
window (1: the repetition window is the ring of the last ``repeat_last_n`` tokens; 0: all tokens).
"""

from __future__ import annotations

TEMPERATURE, TOP_P, TOP_K, REPETITION, PRESENCE, FREQUENCY, UNIFORM, WINDOW = range(8)
PARAMS = 8
