"""The gate and promote stages and what follows them: the gate's verdict, the GTO registry,
tags, remotes, git/DVC commands, the run report."""
