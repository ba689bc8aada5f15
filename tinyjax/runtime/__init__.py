"""Around the step: the workdir and its files (workdir, checkpoint, metrics, record, results, files, tracking) and the
process's life (faults: signals; health: the non-finite record and loss spikes; distributed: several processes). Nothing here imports the trainer."""
