"""The standing hostile corpus (issue #17): one test per defect found, each naming its issue item."""
