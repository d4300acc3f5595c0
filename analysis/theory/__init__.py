"""The simulation of the paper's Section 2: the linear-representation model, global and local predictors, sweeps,
SAE ground truth. Entry points: ``study.theory_study``, ``model.ConceptModel``, ``predict.evaluate_draw``."""
