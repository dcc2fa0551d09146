"""Inference: the Triton adapter (``client``), model specs read from ``config.pbtxt``
(``specs``, the only place tensor names, dtypes and shapes are written down), version routing
and rollout, Triton's model control, drift, and a local Triton runtime (``local_triton/``) for
machines without the NGC Triton image (laptops, CI).
"""
