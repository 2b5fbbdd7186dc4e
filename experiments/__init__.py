"""End-to-end runs of the whole system, what the Makefile's ``demo``, ``sweep-demo`` and ``science``
targets start: ``demo`` (ingest, ``ray job submit`` pretraining, the evaluator, MLflow),
``sweep_demo`` (a Ray Tune sweep over TMA settings), ``science`` and ``science_targets`` (does
pretraining learn: CLIP against CLIP+TMA on phantoms, in-distribution and external). Each step is
a subprocess running the same command a user would (``experiments.shell.sh``)."""
