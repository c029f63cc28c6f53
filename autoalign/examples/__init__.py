"""Examples around the library, not the library itself.

:mod:`autoalign.examples.datasets`
    offline loaders of the image data sets the tests, benchmarks and demo use
    (scikit-learn's digits, MNIST, Fashion-MNIST, CIFAR-10).
:mod:`autoalign.examples.demo`
    ``autoalign demo``: train small networks from different seeds and merge them.
:mod:`autoalign.examples.zoo`
    small example inputs for torchvision's classifiers (``autoalign inspect``, tests).
:mod:`autoalign.examples.transformers`
    tiny Hugging Face transformers from config classes (the ``transformers`` extra).

Nothing is imported here: each submodule is imported when it is used.
"""
