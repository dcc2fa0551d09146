"""One run of a study in a worker: ``prepare`` (fetch, applicability, decode, preview) →
``infer`` (each applicable model, live and shadow arms) → ``finish`` (one transaction: results,
gate, report, final state); ``study.process_study`` runs the three."""
