"""A local Triton without Docker or GPU: the ``tritonserver`` bundled in the ``nvidia-pytriton``
wheel. ``install`` sets the runtime up, ``render`` turns the production repository into
python-backend models, ``process`` runs and supervises the server."""
