"""Training: the shared loop, train state and optimizers, metric writers, and the task trainers."""
