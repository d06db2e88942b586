"""Camera sources: the generic camera (``camera.py``) and the frame readers it decodes with.

``reader.py`` is the interface a reader implements, ``readers.py`` picks one per URL scheme, and
``pyav_reader.py`` is the PyAV/FFmpeg reader. The records a camera hands out are in ``pipeline/frames.py``.
"""
