"""Per-channel input statistics that models need as well as the data pipeline: the CIFAR ResNets' default config
names CIFAR-100's (the other datasets' statistics live with their readers in engine/datasets/)."""
CIFAR100_MEAN, CIFAR100_STD = (0.5071, 0.4865, 0.4409), (0.2673, 0.2564, 0.2762)
