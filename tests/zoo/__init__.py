"""The model zoo: ordinary user models run through every step of both backends."""
