"""How stages run: joining or starting Ray (cluster.py), and running a stage's items in
this process or as Ray work with retries (work.py). Below every other package, so the
cache stage and head training use the same code."""
