"""Label noise on MNIST-1D: how much of SAM's gain each way of spending a budget keeps.

A fraction of the training labels (``--noise``, 20% and 40% by default) is
replaced by labels drawn uniformly from the 10 classes (a new draw per seed;
it may hit the true class). The validation split, held out from the training
split, and the test split stay clean. Every run uses the ``--model``'s
network and recipe: by default the demo's CNN (``examples/mnist1d_demo.py``:
SGD with momentum 0.9, cosine learning rate 0.1, batch 128, the same
epochs); with ``--model transformer`` a small pre-LN transformer on patches
of the signal trained with AdamW (warmup-cosine, ``--weight-decay``,
``--warmup-epochs``). For a given seed every run has the same
initialization, data order and noisy labels.

Each way of spending the budget (a kind, ``--kinds``) runs at each mean
probability ``--p`` of a SAM step and at every radius of ``--rhos``. Each
configuration's radius is chosen on the validation split; test accuracy is
reported at that radius only. The headline is the fraction of SAM's gain over
SGD kept, paired per seed, against cost in gradient evaluations and
wall-clock. Diverged runs are reported, never averaged in. Flatness at the end
of training (top Hessian eigenvalue, epsilon-sharpness) is measured for SGD,
SAM and the best ``--flat-top`` configurations.

The stages, one module each:

- ``kinds``: the table of kinds and the configurations made from it;
- ``transformer``: the transformer of ``--model transformer``;
- ``train``: the noisy labels, the training runs of one (noise, seed) job and
  the flatness of their final models;
- ``stats``: what counts as diverged, the choice of the radius on validation,
  the summaries, the gain kept and the stability of the sweep;
- ``report``: the markdown tables, and the pooling of saved parts
  (``--from-json``);
- ``plots``: the figures;
- ``cli``: the command line, which runs the stages in turn;
- ``budget``: the fixed-budget table (best configuration vs SAM for fewer
  steps vs the base optimizer for more steps) from saved results;
- ``reuse_share``: a probe of the reused term's share and direction in the
  update under SGD and AdamW.

Run (from the repository root):
  python -m benchmarks.label_noise [--workers 2]   the full benchmark
  python -m benchmarks.label_noise --quick          a plumbing check, seconds
Writes label_noise.json, label_noise.png and label_noise_flatness.png to
``--out`` and prints the tables for benchmarks/README.md.
"""
