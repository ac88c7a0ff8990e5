"""Exports of conversation records: DICOM Comprehensive 3D SR (``sr``, needs the ``export``
extra: highdicom). Markdown / text live with the records (``medmvl_core.client.records``)."""
