"""Stage jobs that travel between machines as data: what a job is (`job`), what it moves
through the team's DVC remote besides DVC's own objects (`exchange`), and how a worker runs
one in its own clone (`worker`)."""
