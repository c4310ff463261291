"""Train stage: `train_model` (stage.py) and the pieces it is made of."""
