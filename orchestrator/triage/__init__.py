"""What the model outputs mean for a study: applicability rules (which model sets an image goes
to), findings, the gate (reason codes and urgency) and the human review of flagged studies."""
