"""The reliability tier: bad inputs, load, faults and races against real servers (issue 11)."""
