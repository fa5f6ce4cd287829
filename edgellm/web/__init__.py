"""The console's static files (index.html, console.js, console.css): package data, no build step."""
