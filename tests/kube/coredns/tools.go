//go:build tools

// Keeps the command scripts/kube-up.sh builds in this module's requirements.
package corednsbuild
