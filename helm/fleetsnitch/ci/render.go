// Renders a Helm chart the way Helm's engine does for the functions it uses:
// text/template with missingkey=zero, sprig's TxtFuncMap (minus env/expandenv),
// include, tpl, required, toYaml/fromYaml, .Files.Get/.Files.Glob,
// .Release/.Chart/.Values/.Capabilities. Like Helm's directory loader, the walk
// follows symbolic links (dashboards/ is one).
//
//	render [-values-out FILE [-values-only]] [-notes-out FILE] CHART [VALUES.yaml...]
//
// writes the manifests to stdout, the merged values as JSON to -values-out (what
// Helm validates against values.schema.json) and templates/NOTES.txt rendered to
// -notes-out.
package main

import (
	"bytes"
	"encoding/json"
	"flag"
	"fmt"
	"os"
	"path"
	"path/filepath"
	"sort"
	"strings"
	"text/template"

	sprig "github.com/Masterminds/sprig"
	"sigs.k8s.io/yaml"
)

type files map[string][]byte

func (f files) Get(name string) string { return string(f[name]) }

// Glob returns the files whose chart-relative path matches pattern (path.Match
// syntax; Helm's gobwas/glob agrees on the patterns this chart uses).
func (f files) Glob(pattern string) files {
	out := files{}
	for name, content := range f {
		if ok, _ := path.Match(pattern, name); ok {
			out[name] = content
		}
	}
	return out
}

// walkFollowingLinks calls fn for every regular file below root, following
// symbolic links to files and directories as Helm's sympath.Walk does.
func walkFollowingLinks(root, rel string, fn func(rel, abs string) error) error {
	entries, err := os.ReadDir(filepath.Join(root, rel))
	if err != nil {
		return err
	}
	for _, entry := range entries {
		childRel := filepath.Join(rel, entry.Name())
		abs := filepath.Join(root, childRel)
		info, err := os.Stat(abs)
		if err != nil {
			return fmt.Errorf("%s: %w", abs, err)
		}
		if info.IsDir() {
			if err := walkFollowingLinks(root, childRel, fn); err != nil {
				return err
			}
		} else if err := fn(filepath.ToSlash(childRel), abs); err != nil {
			return err
		}
	}
	return nil
}

func main() {
	valuesOut := flag.String("values-out", "", "write the merged values as JSON to this file")
	notesOut := flag.String("notes-out", "", "write templates/NOTES.txt rendered to this file")
	valuesOnly := flag.Bool("values-only", false, "stop after writing -values-out")
	flag.Parse()
	chart := flag.Arg(0)
	valuesFiles := flag.Args()[1:]
	var chartMeta map[string]interface{}
	b, _ := os.ReadFile(filepath.Join(chart, "Chart.yaml"))
	must(yaml.Unmarshal(b, &chartMeta))
	values := map[string]interface{}{}
	b, _ = os.ReadFile(filepath.Join(chart, "values.yaml"))
	must(yaml.Unmarshal(b, &values))
	for _, vf := range valuesFiles {
		over := map[string]interface{}{}
		b, err := os.ReadFile(vf)
		must(err)
		must(yaml.Unmarshal(b, &over))
		values = merge(values, over)
	}
	if *valuesOut != "" {
		b, err := json.MarshalIndent(values, "", "  ")
		must(err)
		must(os.WriteFile(*valuesOut, b, 0o644))
	}
	if *valuesOnly {
		return
	}
	fs := files{}
	must(walkFollowingLinks(chart, "", func(rel, abs string) error {
		if !strings.HasPrefix(rel, "templates/") {
			c, err := os.ReadFile(abs)
			if err != nil {
				return err
			}
			fs[rel] = c
		}
		return nil
	}))
	top := map[string]interface{}{
		"Values":       values,
		"Release":      map[string]interface{}{"Name": "fleetsnitch", "Namespace": "monitoring", "Service": "Helm", "IsInstall": true, "IsUpgrade": false, "Revision": 1},
		"Chart":        map[string]interface{}{"Name": chartMeta["name"], "Version": chartMeta["version"], "AppVersion": chartMeta["appVersion"]},
		"Files":        fs,
		"Capabilities": map[string]interface{}{"KubeVersion": map[string]interface{}{"Version": "v1.30.0"}},
	}
	t := template.New("gotpl").Option("missingkey=zero")
	funcs := sprig.TxtFuncMap()
	delete(funcs, "env")
	delete(funcs, "expandenv")
	includedNames := map[string]int{}
	funcs["include"] = func(name string, data interface{}) (string, error) {
		includedNames[name]++
		if includedNames[name] > 1000 {
			return "", fmt.Errorf("recursion in %s", name)
		}
		var buf bytes.Buffer
		err := t.ExecuteTemplate(&buf, name, data)
		includedNames[name]--
		return buf.String(), err
	}
	funcs["tpl"] = func(s string, data interface{}) (string, error) {
		tt, err := t.Clone()
		if err != nil {
			return "", err
		}
		tt, err = tt.New("tpl").Parse(s)
		if err != nil {
			return "", err
		}
		var buf bytes.Buffer
		err = tt.Execute(&buf, data)
		return buf.String(), err
	}
	funcs["required"] = func(msg string, v interface{}) (interface{}, error) {
		if v == nil || v == "" {
			return nil, fmt.Errorf(msg)
		}
		return v, nil
	}
	funcs["toYaml"] = func(v interface{}) string {
		out, err := yaml.Marshal(v)
		if err != nil {
			return ""
		}
		return strings.TrimSuffix(string(out), "\n")
	}
	funcs["fromYaml"] = func(s string) map[string]interface{} {
		m := map[string]interface{}{}
		_ = yaml.Unmarshal([]byte(s), &m)
		return m
	}
	funcs["lookup"] = func(string, string, string, string) (map[string]interface{}, error) {
		return map[string]interface{}{}, nil
	}
	t.Funcs(funcs)
	var names []string
	must(filepath.Walk(filepath.Join(chart, "templates"), func(p string, info os.FileInfo, err error) error {
		if err != nil || info.IsDir() {
			return err
		}
		rel, _ := filepath.Rel(chart, p)
		c, _ := os.ReadFile(p)
		_, err = t.New(filepath.Join(chartMeta["name"].(string), rel)).Parse(string(c))
		if err != nil {
			return err
		}
		names = append(names, filepath.Join(chartMeta["name"].(string), rel))
		return nil
	}))
	sort.Strings(names)
	if *notesOut != "" {
		var buf bytes.Buffer
		must(t.ExecuteTemplate(&buf, filepath.Join(chartMeta["name"].(string), "templates/NOTES.txt"), top))
		must(os.WriteFile(*notesOut, []byte(strings.ReplaceAll(buf.String(), "<no value>", "")), 0o644))
	}
	for _, n := range names {
		if strings.HasPrefix(filepath.Base(n), "_") || !(strings.HasSuffix(n, ".yaml") || strings.HasSuffix(n, ".yml")) {
			continue
		}
		var buf bytes.Buffer
		must(t.ExecuteTemplate(&buf, n, top))
		out := strings.ReplaceAll(buf.String(), "<no value>", "")
		if strings.TrimSpace(out) == "" {
			continue
		}
		fmt.Printf("---\n# Source: %s\n%s\n", n, strings.TrimSpace(out))
	}
}

// merge overlays src on dst as Helm coalesces a values file over the defaults:
// maps merge key by key, anything else replaces, and null deletes the key.
func merge(dst, src map[string]interface{}) map[string]interface{} {
	for k, v := range src {
		if v == nil {
			delete(dst, k)
			continue
		}
		if sm, ok := v.(map[string]interface{}); ok {
			if dm, ok := dst[k].(map[string]interface{}); ok {
				dst[k] = merge(dm, sm)
				continue
			}
		}
		dst[k] = v
	}
	return dst
}

func must(err error) {
	if err != nil {
		fmt.Fprintln(os.Stderr, err)
		os.Exit(1)
	}
}
