"""``nemodiff-bench``: decoding speed per mode and batch size, Hugging Face ``generate`` as the baseline,
and a speed-of-light report (forward cost by query length, predicted vs measured tokens/s, roofline).

* :mod:`nemodiff_train.timing`: the interleaved timing protocol (also what ``nemodiff-eval`` times its tokens/s with);
* :mod:`.shapes`: named model shapes (random weights) and the bytes a forward must stream;
* :mod:`.counting`: forwards of a decode by (batch, query length);
* :mod:`.syncs`: host syncs counted while code runs;
* :mod:`.report`: the crossover batch size, the printed table and the plot;
* :mod:`.runner`: the benchmark itself, a sweep over batch sizes (``bench.json`` and ``bench.png``).
"""
