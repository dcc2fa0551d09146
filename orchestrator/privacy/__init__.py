"""Patient data handling: de-identification (``deid`` and its tables), retention and legal hold,
and the log filter that keeps DICOM values out of logs."""
