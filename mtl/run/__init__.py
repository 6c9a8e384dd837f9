"""What a command does, as library functions: recipes, the training loop, checkpoints, adaptation,
evaluation and comparison."""
