"""The job store, the job state machine, matching and reservations."""
