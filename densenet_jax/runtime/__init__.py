"""What a run stands on beyond one process and one disk: paths on local disks and object stores,
the workdir lease, several hosts agreeing, preemption, huge pages and the record of what ran."""
