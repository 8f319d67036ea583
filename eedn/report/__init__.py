"""Reports: tables, figures and terminal output made from results. Imports evaluate, core and runtime."""
