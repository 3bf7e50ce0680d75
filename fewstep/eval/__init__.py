"""Evaluation, by concern (no two of these modules import each other):

* what is sampled: ``samplers`` (teacher and student ``Sampler``s), ``exported`` (an export on stock diffusers),
  ``targets`` (``fewstep eval TARGET``: a run, an export or a teacher);
* the harness: ``harness`` (``evaluate``: shared noise and inputs, NFE, latency, memory, metrics), ``measure``;
* metrics: ``metric`` (the protocol), ``suite`` (metrics by name), ``fid``, ``features``, ``classifier``,
  ``accuracy``, ``clip``, ``digits``, ``weights``; ``diversity`` and ``video`` (pure functions on features),
  ``coverage`` (diversity and precision / recall as metrics, the diversity check), ``teacher_reference`` (a
  teacher's cached samples as the reference of text-to-image students);
* reports: ``report`` (the one row type, tables, grids, ``eval.json`` / ``eval.md``);
* training curves: ``curves`` (a run's TensorBoard scalars, smoothed; ``fewstep compare``, ``scripts/curves.py``);
* workflows: ``periodic`` (evaluation during training), ``quickstart`` (the digits quickstart), ``sample``
  (``fewstep sample``: one file per prompt or label and seed, a contact sheet, ``samples.jsonl``).

Importing this package loads nothing: import the module you need.
"""
