"""Data layer: every source becomes a :class:`~cxrkit.data.base.LabelledImages` (spec, items, reader).

Modules: ``images`` / ``dicom`` (decoding), ``folder`` / ``medmnist`` / ``csv`` (loaders), ``labels`` and
``combine`` (label selection and merging), ``sources`` (config dispatch), ``splits``, ``transforms`` and
``dataset`` (the torch view). Nothing is imported here, so importing a loader stays cheap.
"""
