"""The admin dashboard of the web app: its operations, its JSON API and its pages."""
