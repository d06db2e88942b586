"""Training, evaluation and export of the expression classifier (``ferstream train|eval|export``)."""
