"""``nemodiff-bench``: decoding speed per mode and batch size, Hugging Face ``generate`` as the baseline,
and a speed-of-light report (forward cost by query length, predicted vs measured tokens/s, roofline).

* :mod:`.protocol`: the interleaved timing protocol (also what ``nemodiff-eval`` times its tokens/s with);
* :mod:`.shapes`: named model shapes (random weights) and the bytes a forward must stream;
* :mod:`.runner`: the benchmark itself (``bench.json`` and ``bench.png``).
"""
