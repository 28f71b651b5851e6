"""The verbs' bodies: each composes the floors below (data, evaluation, models, the trainer) for one command."""
