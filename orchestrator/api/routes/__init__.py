"""The HTTP routes, one module per resource (``/v1/studies``, ``/v1/review``, DICOMweb, ...)."""
