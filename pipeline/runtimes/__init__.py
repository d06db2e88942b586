"""Classifier runtimes: what runs the expression network's forward call on a preprocessed batch.

``base.py`` holds the ``ClassifierRuntime`` interface, ``builders.py`` picks one by
``classifier.backend``, and each runtime is its own module (``torch_runtime.py``,
``onnx_runtime.py``). Everything before the forward call (crop, align, normalise, batching) and
after it (softmax) is ``pipeline.classification.ExpressionClassifier``'s, the same for every runtime.
"""
