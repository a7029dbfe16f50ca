"""The paper's method (Pandey et al., MICCAI 2021), free of Ray and MLflow."""
