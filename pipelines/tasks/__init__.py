"""Tasks: registered model builders and evaluations (``pipelines.registry``), one file per kind.

``vision``: CNN / MLP classifiers and classification accuracy. ``lm``: transformers causal LMs
with LoRA and next-token evaluation. Data-set loaders are in ``pipelines.data`` (numpy only,
since they run in the driver).

An evaluation is ``evaluate(model, x, y, device) -> dict`` of *sums* over the rows it was
given, with the number of scored items under ``"count"``: the runtime splits the test set across
its actors, adds their sums and divides each by the total count.
"""
