"""Evaluation: lm-eval on a checkpoint, and a merge's scores normalised by its inputs'.

A task is named in ``fleet.eval.tasks`` in one of four ways:

- an lm-eval task name (``hellaswag``), looked up first in the local task directories
  given alongside it, then among lm-eval's bundled tasks;
- a task YAML file, or a directory of them (lm-eval's own format; ``dataset_path: json``
  with ``dataset_kwargs: {data_files: ...}`` reads local JSONL);
- a JSONL file, made into a task here, one example per line::

      {"prompt": "reverse: abc =", "choices": ["cba", "acb", "bac", "cab"], "answer": 0}
      {"prompt": "add: 2+3 =", "completion": " 05"}

  The first form is multiple choice (metric ``acc``: the answer is the likeliest
  choice); the second is a log-likelihood task (``acc``: the completion is the greedy one).

When every task is local, lm-eval runs offline (``HF_HUB_OFFLINE``, ``HF_DATASETS_OFFLINE``)
and indexes only the local task directories, not its ~10 s index of bundled tasks.

Scores are cached by the checkpoint's file fingerprints and the task definitions, so a
sweep evaluates each input once. Normalised scores follow the merging-at-scale study: a
task owned by an expert (``fleet.eval.owners``) is merged ÷ that expert; any other task is
merged ÷ base.

Modules: ``tasks`` (what ``fleet.eval.tasks`` names, resolved and checked), ``offline``
(Hugging Face libraries kept off the network), ``runner`` (lm-eval on one checkpoint,
with its score cache: ``evaluate_checkpoint``) and ``scores`` (a merge and its inputs,
normalised: ``evaluate_merge``).
"""
