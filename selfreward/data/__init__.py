"""Data the loop and the judge read: seed IFT/EFT examples (`seeds`), human preference data (`preferences`),
and the length limits applied to both (`limits`)."""
