"""Pure loss functions of the tasks (arrays in, scalars out); trainers wire them into steps."""
