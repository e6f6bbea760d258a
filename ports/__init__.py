"""SafeSteer ported: the method's step in code that is not ours, built on the package (docs/porting.md).

    plain_loop   the step in a plain PyTorch loop, no trainer class: sample, force, loss, update
    trl_port     TRL 1.16's DistillationTrainer with the localized loss on S (needs the bench extra)

Run from the repository (`from ports.plain_loop import train_step`); not installed by `pip install .`.
"""
