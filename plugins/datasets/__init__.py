"""The dataset family: the embedded ``digits`` default, CIFAR-10/100, SVHN, long-tailed CIFAR, any folder (or
``.tar.gz``) of images laid out as ``train/<class>/*`` and any torchvision classification dataset.

One module per source (``digits``, ``cifar``, ``svhn``, ``image_folder``, ``torchvision_datasets``), beside what
they share (``common``) and the archive extraction of image folders (``archive``); ``plugins/__init__.py`` registers
each by ``"module:attribute"`` reference, so building one source imports only its own module.

Every source follows the clean protocol (docs/evaluation.md, "Splits"): val and cal are held out of the training
images *before* any training, stratified and seeded, and always read with evaluation transforms;
``train_eval`` is the train split (same indices, same order) with evaluation transforms, for the
frozen-backbone feature cache. Nothing is ever downloaded: a missing dataset is an
:class:`~eedn.runtime.errors.EednError` that says where to put which files.

Hold-outs are made in two seeded stratified steps: first the *validation pool* (``val_size`` images
or ``val_fraction`` of them; plus the test split where a dataset has no official one), then the pool
is split into cal (``cal_fraction`` of it) and val. The train split therefore does not depend on
``cal_fraction``, so changing it keeps backbone checkpoints and cached train features valid.

``describe()`` gives the options that define the data (for cache keys); ``seed`` and ``image_size``
are arguments of ``splits()`` and are recorded in ``DataSplits.info`` instead.
"""
