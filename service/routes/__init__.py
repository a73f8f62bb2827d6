"""HTTP routes. They validate, tokenise, enqueue and await; they never touch a model."""
